"""Ray: connect() (ray.init, runtime env, env defaults), Ray Train for one cycle's training,
Ray Data for one scoring pass, where Ray's output goes, and the files the driver follows.
Imports actors/, al/, nn/, data/."""
