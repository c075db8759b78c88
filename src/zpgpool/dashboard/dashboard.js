// zpgpool's dashboard: polls the JSON of zpgpool.stats.snapshot() and
// draws each pool.  No library: the page must work offline, and inside
// Zope's management screens.  Rates are derived here, from the
// differences of the pools' counters between two polls.
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var WINDOW = 120;               // seconds of history the charts show
  var SMOOTHING = 3;              // polls a rate is taken over
  var STATES = [                  // the bar's segments, left to right
    ["in_use", "in use"],
    ["bound_idle", "bound to an idle thread"],
    ["idle", "idle"],
    ["connecting", "connecting"],
    ["free", "free"]
  ];
  var SERIES = [
    ["checkouts", "Checkouts per second"],
    ["waits", "Waits per second"]
  ];
  var FIGURES = [                 // [key, label, bad when above zero]
    ["wait_p50", "wait median"], ["wait_p99", "wait p99"],
    ["held_p50", "held median"], ["held_p99", "held p99"],
    ["checkouts", "checkouts"], ["waits", "waits"],
    ["timeouts", "timeouts", true], ["connections_failed", "failed connects", true],
    ["connections_opened", "opened"], ["connections_lost", "lost", true],
    ["connections_discarded", "discarded"], ["returned_bad", "returned dirty", true]
  ];

  var root = document.getElementById("zp-dashboard");
  var source = root.getAttribute("data-source");
  var interval = Number(root.getAttribute("data-interval")) || 1000;
  var statusLine = root.querySelector(".zp-status");
  var container = root.querySelector(".zp-pools");
  var empty = root.querySelector(".zp-empty");
  var cards = new Map();          // utility name -> card (DOM and history)

  // -- small helpers ---------------------------------------------------------

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (name) {
      node.setAttribute(name, attrs[name]);
    });
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) { return "\u2014"; }
    if (seconds < 0.001) { return Math.round(seconds * 1e6) + " \u00b5s"; }
    if (seconds < 1) {
      return (seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1) + " ms";
    }
    return seconds.toFixed(2) + " s";
  }

  function rate(value) {
    if (value === 0) { return "0"; }
    return value < 10 ? value.toFixed(1) : String(Math.round(value));
  }

  // A round upper bound for a chart's scale: 1, 2, 3, 4, 5, 6 or 8 times a
  // power of 10, so that the line fills most of the chart.
  function niceCeil(value) {
    if (value <= 1) { return 1; }
    var power = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 3, 4, 5, 6, 8, 10];
    for (var i = 0; i < steps.length; i++) {
      if (value <= steps[i] * power) { return steps[i] * power; }
    }
    return 10 * power;
  }

  // -- one pool's card -------------------------------------------------------

  function makeCard(key) {
    var card = {key: key, samples: [], rates: {checkouts: [], waits: []}};
    var node = card.node = el("section", "zp-pool");
    node.setAttribute("data-pool", key);

    var header = el("header");
    card.title = el("h2");
    card.sub = el("span", "zp-sub");
    card.badge = el("span", "zp-badge");
    card.badge.hidden = true;
    header.append(card.title, card.sub, card.badge);

    card.bar = svg("svg", {"class": "zp-bar", viewBox: "0 0 1000 30",
                           preserveAspectRatio: "none", role: "img"});
    card.segments = {};
    STATES.forEach(function (state) {
      var rect = svg("rect", {"class": state[0], x: 0, y: 0, width: 0,
                              height: 30});
      card.segments[state[0]] = rect;
      card.bar.append(rect);
    });
    card.slots = svg("g");
    card.bar.append(card.slots,
                    svg("rect", {"class": "frame", x: 0, y: 0, width: 1000,
                                 height: 30, "vector-effect": "non-scaling-stroke"}));

    var legend = el("ul", "zp-legend");
    card.legend = {};
    STATES.forEach(function (state) {
      var item = el("li", state[0]);
      var value = el("b", "", "0");
      item.append(el("i"), value, " " + state[1]);
      card.legend[state[0]] = value;
      legend.append(item);
    });

    var charts = el("div", "zp-charts");
    card.charts = {};
    SERIES.forEach(function (series) {
      var figure = el("figure", "zp-chart");
      figure.setAttribute("data-series", series[0]);
      var caption = el("figcaption");
      var now = el("b", "", "\u2014");
      caption.append(el("span", "", series[1]), now);
      var chart = svg("svg", {viewBox: "0 0 300 70",
                              preserveAspectRatio: "none", role: "img",
                              "aria-label": series[1] + ", last two minutes"});
      [4, 37, 69.5].forEach(function (y) {
        chart.append(svg("line", {"class": "grid", x1: 0, x2: 300, y1: y, y2: y,
                                  "vector-effect": "non-scaling-stroke"}));
      });
      var area = svg("polygon", {"class": "zp-area", points: ""});
      var line = svg("polyline", {"class": "zp-line", points: ""});
      chart.append(area, line);
      var axis = el("div", "zp-sub zp-axis");
      var scale = el("span", "", "");
      axis.append(el("span", "", "2 min ago \u00b7 scale 0\u2013"), scale);
      figure.append(caption, chart, axis);
      charts.append(figure);
      card.charts[series[0]] = {svg: chart, line: line, area: area, now: now,
                                scale: scale};
    });

    var figures = el("dl", "zp-figures");
    card.figures = {};
    FIGURES.forEach(function (figure) {
      var box = el("div");
      var value = el("dd", "", "\u2014");
      value.setAttribute("data-figure", figure[0]);
      box.append(el("dt", "", figure[1]), value);
      card.figures[figure[0]] = value;
      figures.append(box);
    });

    card.error = el("p", "zp-error");
    card.error.hidden = true;

    node.append(header, card.bar, legend, charts, figures, card.error);
    return card;
  }

  // Remember the counters of this poll; derive the rates since the last.
  function record(card, time, stats) {
    var last = card.samples[card.samples.length - 1];
    var sample = {t: time, checkouts: stats.checkouts, waits: stats.waits};
    if (last && (sample.checkouts < last.checkouts || sample.waits < last.waits)) {
      // Counters went back: another pool under the same name.
      card.samples = [];
      card.rates = {checkouts: [], waits: []};
      last = undefined;
    }
    if (last && time > last.t) {
      // Over the last three polls rather than one: as true, and steadier
      // to read when a poll comes late.
      var base = card.samples[Math.max(0, card.samples.length - SMOOTHING)];
      SERIES.forEach(function (series) {
        var key = series[0];
        card.rates[key].push({t: time, v: (sample[key] - base[key]) / (time - base.t)});
      });
    }
    if (!last || time > last.t) { card.samples.push(sample); }
    var since = time - WINDOW;
    card.samples = card.samples.filter(function (s) { return s.t >= since; });
    SERIES.forEach(function (series) {
      card.rates[series[0]] = card.rates[series[0]].filter(function (p) {
        return p.t >= since;
      });
    });
  }

  function drawBar(card, stats) {
    var maxconn = Math.max(stats.maxconn, stats.size, 1);
    var counts = {
      in_use: stats.in_use, bound_idle: stats.bound_idle, idle: stats.idle,
      connecting: stats.connecting,
      free: Math.max(0, stats.maxconn - stats.size - stats.connecting)
    };
    var x = 0;
    var words = [];
    STATES.forEach(function (state) {
      var width = 1000 * counts[state[0]] / maxconn;
      var rect = card.segments[state[0]];
      rect.setAttribute("x", x.toFixed(2));
      rect.setAttribute("width", width.toFixed(2));
      rect.setAttribute("data-count", counts[state[0]]);
      x += width;
      card.legend[state[0]].textContent = counts[state[0]];
      words.push(counts[state[0]] + " " + state[1]);
    });
    card.bar.setAttribute("aria-label", "connections: " + words.join(", "));
    // Thin gaps between the connections, while there are few enough to see.
    if (card.slots.getAttribute("data-maxconn") !== String(maxconn)) {
      card.slots.replaceChildren();
      if (maxconn <= 60) {
        for (var i = 1; i < maxconn; i++) {
          var at = (1000 * i / maxconn).toFixed(2);
          card.slots.append(svg("line", {"class": "slot", x1: at, x2: at, y1: 0,
                                         y2: 30, "vector-effect": "non-scaling-stroke"}));
        }
      }
      card.slots.setAttribute("data-maxconn", maxconn);
    }
  }

  function drawChart(chart, points, now) {
    var top = 0;
    points.forEach(function (p) { top = Math.max(top, p.v); });
    var scale = niceCeil(top);
    var coords = points.map(function (p) {
      var x = 300 * (1 - (now - p.t) / WINDOW);
      var y = 69.5 - 65.5 * p.v / scale;
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    chart.line.setAttribute("points", coords.join(" "));
    chart.area.setAttribute("points", coords.length ? coords.join(" ") + " " +
      coords[coords.length - 1].split(",")[0] + ",69.5 " +
      coords[0].split(",")[0] + ",69.5" : "");
    var last = points.length ? points[points.length - 1].v : null;
    chart.svg.setAttribute("data-last", last === null ? "" : last);
    chart.svg.setAttribute("data-count", points.length);
    chart.now.textContent = last === null ? "\u2014" : rate(last) + "/s";
    chart.scale.textContent = scale + "/s";
  }

  function draw(card, stats, now) {
    var name = stats.utility_name || "(unnamed)";
    card.title.textContent = name;
    card.title.title = stats.name !== stats.utility_name ?
      "pool " + stats.name : "";
    card.sub.textContent = stats.size + " of " + stats.maxconn +
      " connections open \u00b7 minconn " + stats.minconn;
    if (stats.closed) {
      card.badge.textContent = "closed";
      card.badge.className = "zp-badge closed";
    } else if (stats.waiting) {
      card.badge.textContent = stats.waiting + " waiting";
      card.badge.className = "zp-badge waiting";
    }
    card.badge.hidden = !stats.closed && !stats.waiting;

    drawBar(card, stats);
    SERIES.forEach(function (series) {
      drawChart(card.charts[series[0]], card.rates[series[0]], now);
    });

    var histograms = stats.histograms || {};
    var wait = histograms.wait || {};
    var held = histograms.held || {};
    var values = {
      wait_p50: duration(wait.p50), wait_p99: duration(wait.p99),
      held_p50: duration(held.p50), held_p99: duration(held.p99)
    };
    FIGURES.forEach(function (figure) {
      var key = figure[0];
      var value = key in values ? values[key] : stats[key];
      var cell = card.figures[key];
      cell.textContent = value === undefined || value === null ? "\u2014" : value;
      cell.className = figure[2] && stats[key] > 0 ? "bad" : "";
    });

    var problems = [];
    if (stats.outage_seconds > 0) {
      problems.push("Server unreachable for " + stats.outage_seconds.toFixed(1) + " s.");
    }
    if (stats.last_connect_error) {
      problems.push("Last connect error: " + stats.last_connect_error);
    }
    card.error.textContent = problems.join(" ");
    card.error.hidden = !problems.length;
  }

  // -- polling ---------------------------------------------------------------

  function show(data) {
    var seen = new Set();
    data.pools.forEach(function (stats) {
      var key = stats.utility_name;
      seen.add(key);
      var card = cards.get(key);
      if (!card) {
        card = makeCard(key);
        cards.set(key, card);
        container.append(card.node);
      }
      record(card, data.time, stats);
      draw(card, stats, data.time);
    });
    cards.forEach(function (card, key) {
      if (!seen.has(key)) {
        card.node.remove();
        cards.delete(key);
      }
    });
    empty.hidden = data.pools.length > 0;
  }

  function setStatus(live, text) {
    statusLine.textContent = text;
    statusLine.className = "zp-status " + (live ? "live" : "down");
    document.body.classList.toggle("disconnected", !live);
  }

  function poll() {
    fetch(source, {cache: "no-store", headers: {Accept: "application/json"}})
      .then(function (response) {
        if (!response.ok) {
          throw new Error("the server answered " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        show(data);
        setStatus(true, "live \u00b7 " + new Date(data.time * 1000).toLocaleTimeString());
      })
      .catch(function (error) {
        setStatus(false, "disconnected \u2014 retrying (" + error.message + ")");
      })
      .then(function () {
        window.setTimeout(poll, interval);
      });
  }

  poll();
}());
