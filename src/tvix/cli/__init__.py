"""Command-line interfaces: ``tvix-store`` and ``nar-bridge``. A thin shell over the library."""
