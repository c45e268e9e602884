"""sat's built-in encoder plugins (imported as ``sat_cli_plugins``)."""
