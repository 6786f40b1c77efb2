//! Policy YAML/JSON: any text parses to policies or to an error, never a
//! panic; whatever parses also resolves (CIDR groups) and computes.
#![no_main]
use std::collections::BTreeMap;

use cilium_labels::LabelSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(docs) = cilium_policy::parse_policies(&text, "fuzz") {
        let mut repo = cilium_policy::Repository::new();
        repo.apply(docs);
        let rules = repo.rules();
        let pod = LabelSet::parse_all(["k8s:app=x", "k8s:io.kubernetes.pod.namespace=default"]);
        let mut ids = BTreeMap::new();
        ids.insert(1u32, LabelSet::parse_all(["reserved:host"]));
        ids.insert(256u32, pod.clone());
        let _ = cilium_policy::compute(&cilium_policy::Input {
            rules,
            labels: &pod,
            identities: &ids,
            own_ports: &Default::default(),
            peer_ports: &Default::default(),
            options: Default::default(),
        });
    }
});
