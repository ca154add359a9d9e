"""Event contracts, the Kafka publisher, the serving SDK and the traffic simulator."""
