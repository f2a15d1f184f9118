"""Active-passive high availability: a floating IP held by one node of a pair (see node.HaNode)."""
