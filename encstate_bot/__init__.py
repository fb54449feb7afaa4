"""encstate: hands out the keys of a room's encrypted state to the members who may read it."""

from .bot import EncStateBot

__all__ = ["EncStateBot"]
