"""The demo of ``zpgpool demo``: a small Pyramid application on waitress.

``demo.zcml`` is its site configuration (it declares the pool ``demo``),
``app.py`` its WSGI application and ``check.py`` the scripted session that
``zpgpool demo --check`` runs against it over HTTP. It needs the ``demo``
extra: ``pip install 'zpgpool[demo]'``.
"""
