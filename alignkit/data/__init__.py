"""alignkit.data"""
