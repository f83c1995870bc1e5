"""In-process unit tests of the serving logic (queues, dispatcher, broker, pools, applications),
driven on an asyncio loop with a fake batch sink; the real-process tests are one level up."""
