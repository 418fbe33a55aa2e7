"""The autoscaler of a Swarm stack: LLM replicas that follow the requests in progress (RayLLM's autoscaling_config)."""
