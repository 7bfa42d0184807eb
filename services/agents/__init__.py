"""Agents department: who the agents are and, second by second, what they are doing."""
