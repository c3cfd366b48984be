"""Shared by every command: flag parsing helpers and the user-error type.

Imports neither Apache Beam nor TensorFlow (a test checks it).
"""
