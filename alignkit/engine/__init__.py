"""alignkit.engine"""
