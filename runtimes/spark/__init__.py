"""The ``spark`` runtime: a saved ``pyspark.ml`` PipelineModel served in real time, by its JVM-free
fast path where every stage has one (see :mod:`ketch.runtimes.spark.runtime`)."""
