"""Measures and statistics on plain numbers and arrays: what an edit did to skin texture and
colour (texture), an evaluate grid's statistics (evalstats), a training phase's convergence rule
(convergence), and anchored face mining's acceptance rule (mining).

The lowest room above the base: it imports no model, no job and no record."""
