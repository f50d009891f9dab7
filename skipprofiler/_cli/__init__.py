"""The `skipprof` command line: one module per subcommand over the library API."""
