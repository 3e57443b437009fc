"""What the relay keeps on disk: staging, spools, the durable writer thread, the free-space
guard."""
