"""The objective: the summed next-token NLL as a function ``f(x, input_ids)`` of a flat subset ``x`` of the
weights (:mod:`.loss`), the subsets themselves (:mod:`.subsets`) and forward-mode products through the model
(:mod:`.forward`)."""
