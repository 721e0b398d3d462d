"""``mmgrow report``: a comparison table and plots over run directories (ablations or not)."""
