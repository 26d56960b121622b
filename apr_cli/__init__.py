"""The ``apr`` command and everything around the library: demo, benchmarks, eval, plots.

Imports ``apr_agents``; ``apr_agents`` never imports this package.
"""
