# Renders the cloud-init user data that turns a hardened Debian/Ubuntu template
# into a DCS edge agent: it writes the agent's certificate bundle and
# configuration, downloads the dcs-edge .deb, checks its SHA-256, installs it
# and starts the service. Used by edge-vm-vsphere and edge-vm-hyperv; it has
# no provider and creates nothing.

locals {
  edge_toml = templatefile("${path.module}/templates/edge.toml.tftpl", {
    listen_address  = var.listen_address
    buffer_capacity = var.buffer_capacity
    aggregator_url  = var.aggregator_url
    proxy_url       = var.proxy_url
  })

  user_data = templatefile("${path.module}/templates/user-data.yaml.tftpl", {
    hostname            = var.hostname
    edge_toml           = local.edge_toml
    ca_pem              = var.ca_pem
    agent_cert_pem      = var.agent_cert_pem
    agent_key_pem       = var.agent_key_pem
    deb_url             = var.deb_url
    deb_sha256          = var.deb_sha256
    proxy_url           = var.proxy_url
    ssh_authorized_keys = var.ssh_authorized_keys
    ntp_servers         = var.ntp_servers
  })

  meta_data = yamlencode({
    "instance-id"    = "dcs-edge-${var.tenant}-${var.agent_id}"
    "local-hostname" = var.hostname
  })
}
