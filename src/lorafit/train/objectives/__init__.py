"""train/objectives"""
