"""The shared chassis of every service: config, logs, tracing, database, outbox/inbox,
consumers, health and the app factory. It knows no domain words."""
