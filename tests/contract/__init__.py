"""The CVAT API contract: recorded exchanges of a real CVAT 2.73, and the tools that send and re-record them."""
