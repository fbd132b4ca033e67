"""The memory and time cost model: value sizes, op times and the liveness simulation of a step."""
