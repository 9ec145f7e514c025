"""alignkit.config"""
