# An edge agent in the lab's vSphere, delivering to this environment's
# aggregators. Real client sites are provisioned the same way, each in its
# own root module and state, with the client's vCenter credentials.

variable "vsphere_server" {
  description = "vCenter of the lab."
  type        = string
}

variable "edge_pki_dir" {
  description = "Directory holding the lab agent's bundle from `dcs-certs agent` (ca.pem, agent.pem, agent-key.pem). Kept outside the repository."
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

# Credentials come from VSPHERE_USER / VSPHERE_PASSWORD in the environment.
provider "vsphere" {
  vsphere_server       = var.vsphere_server
  allow_unverified_ssl = false
}

module "edge_lab_01" {
  source = "../../modules/edge-vm-vsphere"

  datacenter = "lab"
  cluster    = "lab-cluster"
  datastore  = "lab-ssd-01"
  network    = "edge-vlan-120"
  folder     = "dcs/dev"
  template   = "debian-12-cis-template"

  name      = "dcs-edge-lab-01"
  cpus      = 2
  memory_mb = 2048
  disk_gb   = 40

  tenant         = "lab"
  agent_id       = "edge-lab-01"
  aggregator_url = "https://ingest.dev.dcs.example.com:8443"
  proxy_url      = null

  deb_url        = var.edge_deb_url
  deb_sha256     = var.edge_deb_sha256
  ca_pem         = file("${var.edge_pki_dir}/ca.pem")
  agent_cert_pem = file("${var.edge_pki_dir}/agent.pem")
  agent_key_pem  = file("${var.edge_pki_dir}/agent-key.pem")
}
