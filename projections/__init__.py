"""The read side of broker_q: views built only from the event stream (built out by the projections work)."""

__all__: list[str] = []
