"""The application layer: the ``qready`` command line, the ``qready run`` pipeline and its stages,
and the run-directory reports. It sits above the library; no library module imports it."""
