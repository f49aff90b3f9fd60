"""The whole loop on the real engine: chat, rate, learn, promote, hot-swap (slow, engine)."""
