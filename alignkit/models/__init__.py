"""alignkit.models"""
