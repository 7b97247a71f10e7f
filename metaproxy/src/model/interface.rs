//! A network interface of the host, as the kernel names it.

/// A network interface, by index (what the kernel attaches to) and the
/// name it had when we looked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}
