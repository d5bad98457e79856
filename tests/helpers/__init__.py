"""Helpers the tests share: tiny models and data artifacts, toy stages, kill-and-resume tools."""
