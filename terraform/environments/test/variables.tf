variable "region" {
  description = "AWS region of the central stack."
  type        = string
  default     = "eu-central-1"
}

variable "availability_zones" {
  description = "Availability zones of the central stack (2 or 3)."
  type        = list(string)
  default     = ["eu-central-1a", "eu-central-1b"]
}

variable "aggregator_image" {
  description = "dcs-aggregator image in ECR, pinned by digest (the release workflow prints it)."
  type        = string
}

variable "agent_cidrs" {
  description = "Networks the edge agents connect from (VPN / Direct Connect ranges)."
  type        = list(string)
}

variable "monitoring_cidrs" {
  description = "Networks Prometheus scrapes the aggregators from."
  type        = list(string)
  default     = []
}
