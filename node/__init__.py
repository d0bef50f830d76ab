"""The node shell: `helix-node join` (`cli`), the node itself (`node.Node`), its planner role
(`planner_role`), its layers (`layers`, make before break over the shard library), session
admission (`sessions`) and its derived state (`state`). Also the `helix status` and `helix doctor`
commands, which need a swarm peer of their own (`status_cmd`, `doctor_cmd`)."""
