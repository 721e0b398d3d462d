"""Model growth strategies (DESIGN.md §3.5): function-preserving depth and width growth, stacking,
added memory and text-condition branches, context extension; plus replay and freezing helpers."""
