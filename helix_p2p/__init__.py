"""helix-p2p: serve an LLM over a volunteer swarm of mixed GPUs, placed and routed by max-flow.

The core (this package) is pure: cluster and plan data, the flow model, the planner, routing and
the simulator. The shells live in helix_p2p.node, helix_p2p.client and helix_p2p.bootstrap."""

__version__ = "0.1.0"
