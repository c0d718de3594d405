"""Ray rollout workers (``worker``: teacher + versioned student copy) and rank 0's client to them
(``client``: weight sync, shards of a round, recovery from worker or store deaths)."""
