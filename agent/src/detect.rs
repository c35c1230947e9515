//! Is this host a virtual machine? Used when `is_virtual` is not set in agent.toml.

/// DMI strings that only hypervisors report.
const VM_MARKERS: &[&str] = &[
    "qemu",
    "kvm",
    "vmware",
    "virtualbox",
    "innotek",
    "xen",
    "bochs",
    "parallels",
    "virtual machine",
    "bhyve",
    "cloud hypervisor",
    "firecracker",
];

/// Detects virtualisation from the CPU's hypervisor flag and the DMI vendor and product, and
/// says which fact decided.
pub fn is_virtual() -> (bool, String) {
    if let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo")
        && cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
    {
        return (true, "CPU hypervisor flag in /proc/cpuinfo".to_owned());
    }
    for file in ["sys_vendor", "product_name", "board_vendor"] {
        let path = format!("/sys/class/dmi/id/{file}");
        if let Ok(v) = std::fs::read_to_string(&path) {
            let lower = v.trim().to_ascii_lowercase();
            if let Some(m) = VM_MARKERS.iter().find(|m| lower.contains(*m)) {
                return (true, format!("{path} mentions {m:?}"));
            }
        }
    }
    (
        false,
        "no hypervisor flag and no hypervisor in DMI".to_owned(),
    )
}
