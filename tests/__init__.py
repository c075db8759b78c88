# Makes the top-level tests directory a package for zope.testrunner.
