"""The built-in plugins: registered like any site plugin, by the plugin-manager factory."""
