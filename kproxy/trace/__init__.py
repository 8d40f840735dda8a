"""Live traces (`kproxy trace`): a real packet, what the kernel did with it, told as a story."""
