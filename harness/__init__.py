"""Real parts for tests, the demo and the benchmark: a throwaway Synapse, E2EE test users, and
encstate running in maubot's standalone mode."""
