"""Active learning, numpy: query strategies and their arithmetic, what each asks of training,
the label ledger, oracles, budgets, the cold start, the stopping rule. No torch except the cold
start's pool reading. Imports data/ (and names nn/ auxiliaries without importing them)."""
