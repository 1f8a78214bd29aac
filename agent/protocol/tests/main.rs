//! pier-protocol's integration tests: the wire types as a program sending or receiving them
//! sees them.

mod command;
mod hostile;
mod signature;
