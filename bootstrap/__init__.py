"""The bootstrap shell: `helix-bootstrap` (`cli`), a DHT peer with a persistent identity whose
address never changes, the one address a swarm's volunteers need to join."""
