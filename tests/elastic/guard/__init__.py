"""Tests of elastic.guard: plain numbers, no torch."""
