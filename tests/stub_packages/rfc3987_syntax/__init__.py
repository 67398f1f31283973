"""Stands in for the installed rfc3987-syntax in the test processes and every process they start
(tests/conftest.py puts this folder first on PYTHONPATH): importing it fails, so jsonschema skips
its optional IRI format checker. jsonschema comes with every `import ray`, and rfc3987-syntax
(installed through the test extra: HolisticTraceAnalysis -> jupyterlab -> jupyter-events ->
jsonschema[format-nongpl]) builds ~35 Earley parsers when imported: ~2-3 s of CPU in each Ray
process (driver, GCS helpers, agents, every rank actor), ~10 of them per node start. Neither Ray
nor this project validates the "iri" format (Ray's schemas use no format checker), so nothing
under test changes."""
raise ImportError("rfc3987_syntax is stubbed out in the dgx-emu tests (tests/stub_packages)")
