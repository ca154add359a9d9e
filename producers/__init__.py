"""What serving services run: the event contracts, the Kafka publisher (confluent-kafka), the serving
SDK and the traffic simulator. Imports neither the database driver nor the server's libraries, so a
serving process stays light (checked by import-linter and by a test that blocks those imports)."""
