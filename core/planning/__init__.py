"""Planning a pipeline's models to a latency objective at the least cost (InferLine): the
profiles ``ketch profile`` measures, a discrete-event simulator of a pipeline, and the
greedy planner over it."""
