"""Protection management with a real broker and real agents on loopback."""
