"""alignkit.rl"""
