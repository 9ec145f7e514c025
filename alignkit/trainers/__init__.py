"""alignkit.trainers"""
