# An edge agent on the test lab's Hyper-V host, behind the site's outbound
# proxy, delivering to this environment's aggregators.

variable "hyperv_host" {
  description = "Hyper-V host (WinRM over HTTPS)."
  type        = string
}

variable "edge_pki_dir" {
  description = "Directory holding the agent's bundle from `dcs-certs agent` (ca.pem, agent.pem, agent-key.pem). Kept outside the repository."
  type        = string
}

variable "edge_deb_url" {
  description = "URL of the dcs-edge .deb the VM installs."
  type        = string
}

variable "edge_deb_sha256" {
  description = "SHA-256 of that .deb."
  type        = string
}

# Credentials come from HYPERV_USER / HYPERV_PASSWORD in the environment.
provider "hyperv" {
  host     = var.hyperv_host
  port     = 5986
  https    = true
  insecure = false
  use_ntlm = true
}

module "edge_test_01" {
  source = "../../modules/edge-vm-hyperv"

  vm_dir        = "D:\\Hyper-V\\dcs-edge-test-01"
  template_vhdx = "D:\\Hyper-V\\Templates\\debian-12-cis.vhdx"
  switch_name   = "Site-LAN"
  vlan_id       = 120
  seed_zip_dir  = "${path.root}/.seed"

  name      = "dcs-edge-test-01"
  cpus      = 2
  memory_mb = 2048

  tenant         = "test"
  agent_id       = "edge-test-01"
  aggregator_url = "https://ingest.test.dcs.example.com:8443"
  proxy_url      = "http://proxy.site.example.com:3128"

  deb_url        = var.edge_deb_url
  deb_sha256     = var.edge_deb_sha256
  ca_pem         = file("${var.edge_pki_dir}/ca.pem")
  agent_cert_pem = file("${var.edge_pki_dir}/agent.pem")
  agent_key_pem  = file("${var.edge_pki_dir}/agent-key.pem")
}
